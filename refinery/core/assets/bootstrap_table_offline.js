/* refinery: an offline stand-in for bootstrap-table, which no package index ships. Great Expectations' Data Docs
   index fills its tables from JavaScript (columns + data); this draws them as plain Bootstrap tables with
   clickable rows. Sorting, filtering and paging are not offered; method calls ('resetSearch', ...) do nothing. */
(function ($) {
  if (!$ || $.fn.bootstrapTable) return;
  $.fn.bootstrapTable = function (options) {
    if (typeof options !== "object" || options === null) return this;
    return this.each(function () {
      var table = $(this).addClass("table table-hover table-sm");
      var cols = options.columns || [];
      var head = $("<thead><tr></tr></thead>");
      cols.forEach(function (c) { head.find("tr").append($("<th>").text(c.title || c.field)); });
      var body = $("<tbody>");
      var attrsOf = window[options.rowAttributes];
      (options.data || []).forEach(function (row, i) {
        var tr = $("<tr>");
        var attrs = typeof attrsOf === "function" ? attrsOf(row, i) : {};
        Object.keys(attrs).forEach(function (k) { tr.attr(k, attrs[k]); });
        cols.forEach(function (c) { tr.append($("<td>").html(row[c.field] == null ? "" : String(row[c.field]))); });
        tr.css("cursor", "pointer").on("click", function () { table.trigger("click-row.bs.table", [row, tr]); });
        body.append(tr);
      });
      table.empty().append(head, body);
    });
  };
  $(function () { $('table[data-toggle="table"]').addClass("table table-sm"); });
})(window.jQuery);
